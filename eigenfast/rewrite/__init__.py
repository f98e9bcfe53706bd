"""What eigenfast writes into a model, shared by every feature that changes one.

``position_tables``: projections with a position-indexed bias (what freezing and mean
ablation leave); ``stand_ins``: what circuit extraction puts where it removed or cut a
component; ``kinds``: every such module by the name a saved spec records; ``positional``:
decoder layers that hand token positions down to them; ``surgery``: module swaps and
plain attributes, recorded so a save gets them back.
"""
