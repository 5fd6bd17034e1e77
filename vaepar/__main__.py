from vaepar.cli import main

main()
