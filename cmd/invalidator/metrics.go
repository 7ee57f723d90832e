package main

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
