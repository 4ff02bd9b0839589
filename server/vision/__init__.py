"""Pure image maths: decoding, letterboxing, detector output decoding, person choice and crop,
background compositing. No gRPC, no Triton."""
