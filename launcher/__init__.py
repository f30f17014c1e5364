"""The `ganforge` command line: data tools, training, sampling, launching and the demo."""
