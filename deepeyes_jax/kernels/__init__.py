"""Attention implementations behind one interface (`attention.attention`)."""
