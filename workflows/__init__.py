"""Nipype workflows built on the regpipe library, installed as ``regpipe.workflows``."""
