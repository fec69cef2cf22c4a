// Typed protocol errors, mirroring shared/errors.py: every error has the stable `code` that
// Python gives (sent back in an Error frame) and, where it applies, the `field` at fault.

export class ProtocolError extends Error {
  static code = 'protocol_error';

  constructor(message, field = null) {
    super(message);
    this.name = new.target.name;
    this.field = field;
  }

  get code() {
    return this.constructor.code;
  }
}

export class FrameError extends ProtocolError { static code = 'bad_frame'; }
export class FrameTooLarge extends FrameError { static code = 'frame_too_large'; }
export class UnsupportedVersion extends FrameError { static code = 'unsupported_version'; }
export class MessageError extends ProtocolError { static code = 'bad_message'; }
export class BadUpdate extends ProtocolError { static code = 'bad_update'; }
export class BadSignature extends ProtocolError { static code = 'bad_signature'; }
export class Replay extends ProtocolError { static code = 'replay'; }
