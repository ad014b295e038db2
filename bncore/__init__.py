"""bncore: batch normalization from first principles."""
