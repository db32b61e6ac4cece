"""Reconciliation: does every client's 00 have a posting in force at billing, and only they?

:mod:`.rules` judges (pure); :mod:`.sources` reads the acquirer's, the gateway's and
billing's databases and judges them.
"""
