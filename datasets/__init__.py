"""Built-in dataset plugins, one per module; installed as `robustbench_mat.datasets`."""
