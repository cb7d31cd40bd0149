// A small typed event emitter (no dependency, works in browsers and Node).

type Handler<T> = (event: T) => void;

export class Emitter<Events> {
  private handlers = new Map<keyof Events, Set<Handler<never>>>();

  /** Calls `handler` for every `event`; returns a function that stops it. */
  on<K extends keyof Events>(event: K, handler: Handler<Events[K]>): () => void {
    let set = this.handlers.get(event);
    if (!set) {
      set = new Set();
      this.handlers.set(event, set);
    }
    set.add(handler as Handler<never>);
    return () => this.off(event, handler);
  }

  off<K extends keyof Events>(event: K, handler: Handler<Events[K]>): void {
    this.handlers.get(event)?.delete(handler as Handler<never>);
  }

  /** The next `event`, as a promise. */
  once<K extends keyof Events>(event: K): Promise<Events[K]> {
    return new Promise((resolve) => {
      const stop = this.on(event, (e) => {
        stop();
        resolve(e);
      });
    });
  }

  protected emit<K extends keyof Events>(event: K, value: Events[K]): void {
    for (const h of [...(this.handlers.get(event) ?? [])]) {
      try {
        (h as Handler<Events[K]>)(value);
      } catch (e) {
        // One listener's bug must not stop the others or the SDK.
        console.error(`floe: a "${String(event)}" listener threw`, e);
      }
    }
  }
}
