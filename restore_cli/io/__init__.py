"""Discovery of inputs, image decoding/encoding with metadata carry-over, atomic writes."""
