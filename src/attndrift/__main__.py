from attndrift.cli import main

main()
