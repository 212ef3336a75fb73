"""The ``tidings`` command. One module per group of commands:

    main.py      the parser and dispatch; `pub`, `sub`, and `serve` (which runs tidings.broker.serve)
    queues.py    `queues` (ls, declare, peek, info, purge, delete) and `dlq` (ls, redrive, purge)
    streams.py   `streams` (ls, declare, read, info, trim, delete)
    ops.py       `stats` and `backup`
    passwd.py    `passwd`
    common.py    what the commands that talk to a broker share: options, runner, exit statuses, output
"""
