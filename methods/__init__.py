"""Built-in method plugins, one per module; installed as `robustbench_mat.methods`."""
