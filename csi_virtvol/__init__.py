"""csi-virtvol: a CSI driver of virtual volumes composed of LUNs from several arrays."""

DRIVER_NAME = "virtvol.csi.example.org"
VERSION = "0.1.0"
