"""Learning to learn by gradient descent by gradient descent (Andrychowicz et al., 2016).

`lstm.lstm_optimizer(meta_params)` is the learned optimizer as an optax transformation; `train`
meta-trains it on the task families of `tasks`; `baselines` and `evaluate` compare it with tuned
hand-designed optimizers.
"""
