"""One module per stage; stages never import Ray."""
