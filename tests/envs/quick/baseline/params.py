# Hyperparameters of the toy "training" run; ideas edit these.
LEARNING_RATE = 0.1
STEPS = 20
MOMENTUM = 0.0
