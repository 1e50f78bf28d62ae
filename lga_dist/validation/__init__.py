"""Does the ranking name the layer where edits take? The request x layer edit grid and its report."""
