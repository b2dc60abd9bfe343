"""One module per DVC stage: its params and `run(inputs, params, out_dir, key) -> payload`.

A stage reads files and params, writes one output folder atomically with its stamp last, and never imports
another stage; what two stages share lives in a lower layer (builders, families, recipes, backends, core).
"""
