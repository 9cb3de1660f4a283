"""What `bench.py` measures, one concern per module: `workload` (the requests, the machine's ceilings, the
model's costs, the roofline), `offline` (runs against the engine in this process), `peer` (HF transformers on
the same workload), `online` (a server under load) and `speculative` (speculative decoding against plain);
`bench.py` is the command line over them. Standalone: `layout_agreement` and `quant_agreement` (greedy tokens of
a TP/PP layout against one process, of a quantised model against the full-precision one) and `quant_kernels`
(the quantised kernels' sweep)."""
