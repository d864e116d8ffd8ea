"""Data: reading data sets and images, one streaming decoder, the pixel budget and the decode
firewall."""
