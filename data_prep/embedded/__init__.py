"""The embedded offline dataset: real and substituted crystal structures with GFN1-xTB projected DOS."""
