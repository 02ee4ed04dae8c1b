"""Training Mixtures of Prompts on a frozen backbone: data (BIG-bench from the sdist), the trainer
(gate pretraining, joint training, exact resume), and the federated setting."""
