// The ambient abort signal of the work the current async context belongs to (a reconcile). KubeClient requests
// honour it, so a reconcile abandoned on leadership loss, timeout or stop makes no further API call although
// controllers need not pass the signal by hand. Timers of the runtime's clocks run their callbacks outside it:
// work scheduled from a reconcile (a debounce, a retry, an event series flush) outlives that reconcile.
import { AsyncLocalStorage } from 'node:async_hooks';

const ambientSignal = new AsyncLocalStorage<AbortSignal | undefined>();

/** Runs fn with signal as the ambient signal of every KubeClient request made in it (and in what it awaits). */
export function runWithSignal<R>(signal: AbortSignal | undefined, fn: () => R): R {
  return ambientSignal.run(signal, fn);
}

/** The ambient signal of the current async context, if any. */
export function currentSignal(): AbortSignal | undefined {
  return ambientSignal.getStore();
}
