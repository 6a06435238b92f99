# One knob of the steady_mix stand-in training; ideas set it.
VALUE = 0.0
