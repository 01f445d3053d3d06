"""Gate order of torch's fused recurrent layers (``nn.LSTM``'s i, f, g, o; ``nn.GRU``'s r, z, n).

Row-slice clusters of a fused RNN and the mpnas LSTM's per-gate modules share it, so neither
the precision maps nor the models import each other.
"""

LSTM_GATES = ("input_gate", "forget_gate", "cell_gate", "output_gate")
GRU_GATES = ("reset_gate", "update_gate", "new_gate")
