"""What a run shows of itself while and after it trains.

The console (`progress`), metrics.jsonl and TensorBoard files (`metrics_log`,
`tensorboard_log`), where the wall time went (`goodput`), model FLOPs and MFU (`flops`),
profiler traces (`profiling`) and a PNG of the curves (`report`, also
`python -m observe.report RUN_DIR`). Nothing here imports the training loop: it reports on
a run, it does not drive one.
"""
