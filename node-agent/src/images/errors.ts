// The one error type of the image library; re-exported by cache.ts (the public entry point).

export type ImageErrorReason =
  | 'DownloadFailed'
  | 'ChecksumMismatch'
  | 'FormatMismatch'
  | 'NotADiskImage'
  | 'NoSpace'
  | 'TooBig';

/** A refusal with a machine reason (for a Server/Image condition) and a message that says what and why. */
export class ImageError extends Error {
  override readonly name = 'ImageError';
  readonly reason: ImageErrorReason;
  constructor(reason: ImageErrorReason, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.reason = reason;
  }
}
