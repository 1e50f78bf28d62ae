"""One module per job: a ``Config`` dataclass, a ``DESCRIPTION`` and ``run(config) -> (summary, exit code)``.

``lga_dist.cli`` turns them into ``lga-dist <job>`` subcommands and ``jobs/*.py``
into scripts for ``ray job submit``; both share the parsing and error handling.
"""
