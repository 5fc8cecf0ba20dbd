class Crosscoder: pass
class CrosscoderOutput: pass
