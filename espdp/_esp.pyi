"""Typed stub of src_cython/espdp/_esp.pyx: it has C-level functions only
(esp_output, esp_input, parse_outer), used by _engine; nothing for Python."""
