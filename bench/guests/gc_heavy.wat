;; A GC-heavy run: allocates 2,000,000 structs of two fields, keeping the latest 1,024 alive in
;; a ring (an array of references), so that the collector frees the rest as it goes; traps if
;; the struct written last (in slot 1999999 mod 1024 = 127) does not hold the last value.
(module
  (type $pair (struct (field i64) (field i64)))
  (type $ring (array (mut (ref null $pair))))
  (memory (export "memory") 1)
  (func (export "_start")
    (local $ring (ref $ring))
    (local $i i32)
    (local.set $ring (array.new_default $ring (i32.const 1024)))
    (loop $again
      (array.set $ring (local.get $ring) (i32.and (local.get $i) (i32.const 1023))
        (struct.new $pair (i64.extend_i32_u (local.get $i)) (i64.const 7)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $again (i32.lt_u (local.get $i) (i32.const 2000000))))
    (if (i64.ne
          (struct.get $pair 0 (array.get $ring (local.get $ring) (i32.const 127)))
          (i64.const 1999999))
      (then unreachable))))
