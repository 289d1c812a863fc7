"""Entity discovery in captioned videos through bipartite entity-name graphs and visual agreement."""
