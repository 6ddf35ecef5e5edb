"""The train-trainjob component: multi-node training on a Kubeflow Trainer TrainJob (see README.md)."""
