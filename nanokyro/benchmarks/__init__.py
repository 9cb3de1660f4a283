"""What `bench.py` measures, one concern per module: `workload` (the requests, the machine's ceilings, the
model's costs, the roofline), `offline` (runs against the engine in this process), `peer` (HF transformers on
the same workload) and `online` (a server under load). `bench.py` is the command line over them."""
