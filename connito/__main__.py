from connito.cli.main import main

main()
