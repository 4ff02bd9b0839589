"""Pure image maths: decoding, letterboxing, detector output decoding. No gRPC, no Triton."""
