"""Training: builders that turn a RunConfig into parts (data, model, objective, optimizer, evaluators), the
loop (`trainer`), the exact step, optimizer and schedules, parallel wrapping, metric sinks. Imports all below app."""
