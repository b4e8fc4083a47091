"""The regpipe BIDS App (command line, BIDS queries, templates), installed as
``regpipe.bids_app``."""
