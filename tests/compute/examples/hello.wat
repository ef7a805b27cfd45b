;; A function in WAT: writes a CGI response with one WASI fd_write call.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "Content-Type: text/plain\nX-Lang: wat\n\nhello from wat\n")
  (func (export "_start")
    ;; iovec at 0: {ptr = 64, len = 53}; bytes written go to 16
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 53))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16)))))
