from lobsterd.cli.main import main

main()
