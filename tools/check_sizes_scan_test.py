"""The scans of tools/check_sizes.py on small sources whose functions are known."""

import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import check_sizes  # noqa: E402


def cpp(text):
    return [(name, line, count) for name, line, count in check_sizes.cpp_functions(text)]


class CppScanTest(unittest.TestCase):
    def test_functions_methods_and_tests(self):
        src = """#include "x.h"
namespace kt {
namespace {
int Add(int a, int b) {
  return a + b;
}
}  // namespace

class Foo {
 public:
  int get() const { return x_; }
 private:
  int x_ = 0;
};

Foo::Foo(int x)
    : x_(x), y_{x} {
  if (x) { x_ = 1; }
}

TEST(FooTest, Works) {
  auto f = [](int v) { return v; };
  EXPECT_EQ(f(1), 1);
}
}  // namespace kt
"""
        self.assertEqual(cpp(src), [("Add", 4, 3), ("get", 11, 1), ("Foo::Foo", 16, 4), ("TEST", 21, 4)])

    def test_braces_in_strings_comments_and_raw_strings_are_skipped(self):
        src = """void F() {
  const char* s = "}}}{";  // }
  /* { */
  const char* r = R"(
}
)";
  char c = '}';
}
struct S { int v[2] = {1, 2}; };
constexpr int kTable[] = {1, 2, 3};
"""
        self.assertEqual(cpp(src), [("F", 1, 8)])

    def test_preprocessor_lines_are_skipped(self):
        src = """#define BODY { return 1; }
#if 1
int G() {
  return 2;
}
#endif
"""
        self.assertEqual(cpp(src), [("G", 3, 3)])


class PythonScanTest(unittest.TestCase):
    def test_nested_functions_and_methods(self):
        src = '''class A:
    @staticmethod
    def f(x):
        def g():
            return 1

        return g()


def h():
    pass
'''
        self.assertEqual(
            list(check_sizes.python_functions(src, "x.py")), [("A.f", 2, 6), ("A.f.g", 4, 2), ("h", 10, 2)]
        )


if __name__ == "__main__":
    unittest.main()
