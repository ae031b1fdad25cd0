"""The train step compiled for a mesh: tracing and lowering it (`step`), XLA's persistent
compilation cache (`jax_cache`), and whole executables saved for restarts that skip
tracing too (`executables`)."""
