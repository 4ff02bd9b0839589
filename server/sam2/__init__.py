"""SAM 2 on Triton: everything the Segment and Track calls run, split the way SAM 2 splits it
(the model parts in Triton apart from the stateful predictors that string them together).

Per tracked frame (video_predictor.py, SAM 2's ``sam2_video_predictor``):
  the frame is decoded and resized into the encoder's request (frame_calls.ResizedFrame) ->
  per object, samurai.MemoryBank picks the memories and pointers memory attention reads ->
  the parts run in Triton (frame_calls.FrameCalls: one deadline, shared-memory slots, bytes
  moved) -> samurai.CandidateSelector chooses among the decoder's candidates -> the memory
  encoder encodes the chosen mask into the bank -> masks.py upsamples the chosen low-res logits
  to the frame and encodes them as COCO RLE.

Where each concern is:
  contract.py          the parts' model names and sizes as Triton serves them (Sam2Contract)
  prompts.py           box and point prompts: validation and the decoder's prompt tensors
  image_predictor.py   one image, one prompt, every candidate mask (the Segment call)
  video_predictor.py   one frame of a session at a time, several objects (the Track call, the
                       segment-video job)
  frame_calls.py       the per-frame Triton calls and the tensors written straight into them
  session.py           what a session keeps between frames, and that state as bytes (handoff)
  session_registry.py  the sessions a replica holds: keys, idle eviction, drain and handoff
  masks.py             low-res mask logits -> a mask at the frame's size, its box, COCO RLE
  samurai/             SAMURAI's maths (Kalman filter, candidate choice, memory bank,
                       snapshot format), pure numpy
"""
