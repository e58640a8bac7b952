from replicator.cli.entry import main

main()
