"""Model-Agnostic Meta-Learning (Finn, Abbeel, Levine, 2017), with Meta-SGD and MAML++ options."""
