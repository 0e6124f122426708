"""Lightning callbacks that show what the experts do."""
