"""Building blocks of the transformer: norm, rotary, linear, attention, activation, embedding."""
