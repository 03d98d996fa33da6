"""The top layer, what users run: the `cliptrain` command line, `cliptrain.load` inference, embeddings, the run
report and the evaluation-harness plug-in. It may import every other layer; nothing imports it."""
