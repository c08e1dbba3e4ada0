"""Shared fixtures: a tiny random Llama (tied and untied) with a byte-level chat tokenizer.

Everything is built in memory, deterministic and fast; nothing touches a hub.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from threads, and on a shared 2-core machine torch's spinning worker
# threads make small matmuls many times slower. Subprocesses inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
# DIFFMAS_TEST_DEVICE=cuda runs the tiny-model tests on a GPU (the library's device paths); CI: cpu.
TEST_DEVICE = os.environ.get("DIFFMAS_TEST_DEVICE", "cpu")
SHARED_DATA = Path(os.environ.get("DIFFMAS_DATA_DIR", REPO.parent / "shared" / "data"))

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer():
    """Byte-level tokenizer: 256 byte symbols + 3 chat specials (259 ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<|pad|>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_model(tied: bool, seed: int = 0, vocab_size: int = 259, width: int = 64, init: float = 0.2):
    """A 2-layer random Llama, `width` wide (4 heads, 2 KV heads, MLP twice as wide)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        # A wide init makes the layers matter next to the residual stream: with the default 0.02 a
        # tied model just repeats its last input token, and parity tests would compare constants.
        initializer_range=init,
        tie_word_embeddings=tied,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).to(TEST_DEVICE).eval().requires_grad_(False)


def make_backbone(tied: bool, seed: int = 0, width: int = 64, init: float = 0.2):
    from diffmas.backbone import Backbone, prepare_tokenizer

    tok = make_tokenizer()
    prepare_tokenizer(tok)
    name = f"tiny-{'tied' if tied else 'untied'}" + (f"-{width}" if width != 64 else "")
    return Backbone(model=make_model(tied, seed, width=width, init=init), tokenizer=tok, name=name)


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def backbone(request):
    return make_backbone(tied=request.param)


@pytest.fixture
def tied_backbone():
    return make_backbone(tied=True)


@pytest.fixture
def untied_backbone():
    return make_backbone(tied=False)


def data_file(name: str) -> Path:
    """A benchmark file from the shared data folder; the test is skipped if it is not there."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not found: set DIFFMAS_DATA_DIR to the benchmark JSONL folder")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared benchmark data not found at {SHARED_DATA} (set DIFFMAS_DATA_DIR)")
    return SHARED_DATA
