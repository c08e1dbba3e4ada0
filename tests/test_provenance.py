"""Run records' provenance (diffmas.provenance): the commit they name, and when it is dirty."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from diffmas.provenance import git_commit

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="NOT TESTED: git is not installed")


def git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def test_a_rewritten_benchmark_result_leaves_the_commit_clean_and_a_code_edit_does_not(tmp_path):
    """A benchmark that rewrites its results file must not mark the next benchmark's record dirty;
    an edit to code must."""
    (tmp_path / "src").mkdir()
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "src" / "code.py").write_text("x = 1\n")
    (tmp_path / "bench" / "results" / "a.json").write_text("{}\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "-A")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    commit = git_commit(tmp_path / "src")
    assert commit and not commit.endswith("+dirty")
    (tmp_path / "bench" / "results" / "a.json").write_text('{"new": 1}\n')
    assert git_commit(tmp_path / "src") == commit
    (tmp_path / "src" / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path / "src") == commit + "+dirty"
