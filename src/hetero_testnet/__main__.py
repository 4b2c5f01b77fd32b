from hetero_testnet.cli import main

main()
