from diffmas.cli import main

main()
